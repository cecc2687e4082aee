"""A generated MIND-format data set with structure an LLM can learn.

`generate_mind(config, folder)` writes `behaviors.tsv` and `news.tsv` exactly as MIND
ships them (tab separated, no header, 5 and 8 columns) so the real converter reads them.

Structure:

- `config.topics` topics; each is a category with three subcategories and its own
  vocabulary, and every news title/abstract is a headline built from its topic's
  words ("Quarterback rallies past division rivals after overtime thriller"), so the
  text reveals the topic.
- Within a topic, news popularity is skewed (a few items are drawn far more often).
- Every user has long-term interests (1-3 topics with random weights) and drifts toward
  one other topic: the later a history position, the likelier it comes from the drift
  topic. Clicks come from the current interests (drift topic or long-term ones), so both
  the most recent items and a summary of the whole history predict the next click.
- Each user has `rows_per_user` impression rows sharing one history, at increasing
  times; each row shows `impressions` news: one clicked ("-1"), the rest random ("-0").
- History lengths are uniform in [min_history, max_history] except for about 5% of
  users whose lengths fall outside it (some empty), so a length filter has work to do.

Everything is vectorised numpy plus Arrow/Polars string kernels, in fixed-size chunks of
users whose random streams derive from (seed, chunk number): the same config and seed
give byte-identical files, and memory stays small at MIND-large size.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.data.config import SyntheticConfig
from trsr.errors import ConfigError

BEHAVIORS = "behaviors.tsv"
NEWS = "news.tsv"

USERS_PER_CHUNK = 50_000  # part of the output's definition: changing it changes files
OUT_OF_RANGE_SHARE = 0.05
DRIFT_MAX = 0.8  # probability that the last history item comes from the drift topic
CLICK_DRIFT = 0.6  # probability that a click comes from the drift topic
POPULARITY_EXPONENT = 0.8
START = 1573257600  # 2019-11-09 00:00:00 UTC, the first day of MIND's train split
SPAN_SECONDS = 6 * 24 * 3600
TIME_FORMAT = "%-m/%-d/%Y %-I:%M:%S %p"  # MIND: "11/9/2019 8:05:31 AM"

# category | subcategories | subjects | verbs | objects | events | adjectives
_TOPICS = """
sports|football_nfl,basketball_nba,soccer|quarterback,head coach,star forward,rookie receiver,veteran pitcher,team captain,goalkeeper,point guard|rallies past,beats,signs with,stuns,edges,trades for,shuts out,dominates|division rivals,the defending champions,a playoff contender,the home crowd,the conference leaders,a rival club,the league leaders,an old rival|overtime thriller,trade deadline,playoff race,season opener,championship game,injury report|undefeated,injured,rising,struggling,record-setting,late-season
finance|markets,personalfinance,companies|stock market,federal reserve,retirement saver,bank,hedge fund,tech giant,mortgage lender,treasury yield|slides on,rallies after,cuts,raises,warns about,bets on,reports,doubles|interest rates,quarterly earnings,a stock buyback,bond yields,the dividend,credit card debt,a recession risk,inflation data|earnings season,rate decision,market selloff,trading session,IPO filing,budget review|volatile,bullish,bearish,record,cautious,surprising
foodanddrink|recipes,restaurants,wine|chef,home cook,baker,food critic,restaurant owner,sommelier,pastry chef,pitmaster|shares,perfects,reviews,bakes,grills,pairs,rethinks,serves|a pumpkin pie,the perfect steak,a holiday roast,sourdough bread,a weeknight pasta,craft cocktails,a vegan stew,apple cider|Thanksgiving dinner,tasting menu,food festival,brunch service,harvest season,wine tasting|crispy,savory,easy,homemade,seasonal,spicy
travel|travelnews,destinations,airlines|traveler,airline,cruise line,flight attendant,hotel chain,tour guide,backpacker,national park|adds routes to,cancels,unveils,explores,upgrades,recommends,bans,discovers|a hidden beach,holiday flights,a scenic road trip,the carry-on rule,an island resort,a mountain village,budget fares,a river cruise|holiday travel rush,flight delay,cruise season,passport backlog,airport expansion,winter getaway|scenic,remote,affordable,luxury,crowded,underrated
weather|weathertopstories,storms,climate|forecasters,storm system,cold front,hurricane,snowstorm,heat wave,tornado,arctic blast|threatens,brings,batters,slams,sweeps across,floods,freezes,delays|the coastline,record snowfall,heavy rain,the morning commute,power lines,the plains,freezing temperatures,the holiday weekend|winter storm warning,flood watch,first frost,storm season,weekend forecast,cold snap|severe,icy,record-breaking,dangerous,windy,soggy
health|wellness,medical,fitness|doctors,researchers,nutritionist,new study,personal trainer,flu season,heart surgeon,sleep expert|links,warns about,recommends,reveals,questions,tracks,reduces,boosts|heart disease,a daily walk,the flu vaccine,blood pressure,better sleep,gut health,weight loss,chronic stress|clinical trial,health alert,fitness challenge,vaccine rollout,annual checkup,medical breakthrough|healthy,surprising,early,chronic,simple,daily
autos|autosnews,autosenthusiasts,electricvehicles|automaker,electric truck,sports car,dealer,pickup,crossover,carmaker,safety regulator|recalls,unveils,tests,prices,redesigns,upgrades,launches,outsells|a new sedan,the battery pack,thousands of SUVs,a hybrid engine,the fleet,a charging network,the dashboard,a concept car|auto show,recall notice,road test,model year launch,crash test,price war|electric,fastest,rugged,compact,redesigned,affordable
music|musicnews,concerts,albums|singer,rapper,rock band,pop star,songwriter,country singer,orchestra,record label|releases,announces,covers,headlines,drops,teases,tops,cancels|a new album,a world tour,the charts,a surprise single,a farewell concert,a music video,the festival stage,a duet|album release,concert tour,music festival,award nomination,reunion show,studio session|acoustic,chart-topping,surprise,sold-out,debut,live
movies|movienews,reviews,boxoffice|director,box office,studio,film critic,lead actor,franchise,streaming service,casting team|casts,reviews,delays,tops,reboots,premieres,confirms,wraps|a sequel,the opening weekend,a superhero film,a horror remake,the trailer,an indie drama,the red carpet,a biopic|film festival,opening weekend,trailer drop,award season,premiere night,casting news|blockbuster,long-awaited,animated,critically acclaimed,record-breaking,surprise
tv|tvnews,tv-celebrity,realitytv|showrunner,network,talk show host,reality star,streaming series,sitcom cast,late-night host,news anchor|renews,cancels,teases,recaps,reunites,premieres,finales,hosts|the final season,a reboot,the season finale,a holiday special,a spinoff,the ratings,a reunion episode,the pilot|season premiere,ratings week,finale night,holiday special,network upfront,binge weekend|shocking,emotional,new,returning,hit,canceled
politics|newspolitics,elections,policy|senator,governor,lawmakers,the president,city council,campaign,state legislature,voters|debate,approve,block,propose,challenge,support,investigate,veto|a spending bill,the new policy,a tax plan,election results,the budget,a voting law,the impeachment inquiry,health care reform|election day,budget vote,town hall,primary race,policy debate,committee hearing|bipartisan,contested,controversial,key,swing-state,late-night
technology|technews,gadgets,software|smartphone maker,software update,startup,chipmaker,app developer,social network,cloud provider,hackers|launches,patches,acquires,leaks,upgrades,unveils,disrupts,targets|a foldable phone,the new chip,user privacy,a smart speaker,the operating system,a data breach,wireless earbuds,an AI assistant|product launch,security patch,developer conference,earnings call,software rollout,device leak|wireless,smart,faster,cheaper,encrypted,next-generation
science|space,environment,discoveries|astronomers,scientists,NASA,rover,space telescope,archaeologists,marine biologists,physicists|discover,capture,map,launch,detect,study,uncover,photograph|a distant galaxy,ancient ruins,a new species,the moon's surface,black holes,coral reefs,dinosaur fossils,a comet|rocket launch,meteor shower,research expedition,eclipse viewing,space mission,fossil find|ancient,distant,rare,massive,mysterious,first-ever
lifestyle|lifestyleroyals,home,parenting|royal family,parents,interior designer,influencer,couple,homeowners,grandparents,wedding planner|redesigns,celebrates,shares,plans,organizes,hosts,welcomes,renovates|a cozy living room,holiday traditions,a backyard makeover,the nursery,a dream wedding,family photos,a tiny house,the guest list|royal wedding,holiday season,home makeover,baby shower,garage sale,anniversary party|cozy,heartwarming,minimalist,festive,charming,royal
realestate|housing,realestatenews,mortgages|home buyers,real estate agent,landlord,developer,housing market,renters,appraiser,condo board|list,renovate,buy,sell,flip,price,lease,appraise|a historic mansion,starter homes,a downtown condo,the listing,a waterfront estate,rental units,the asking price,a fixer-upper|open house,bidding war,housing boom,closing day,rent hike,market slowdown|historic,affordable,waterfront,luxury,spacious,overpriced
gaming|videogames,esports,consoles|game studio,esports team,console maker,streamer,game designer,speedrunner,publisher,pro gamer|releases,patches,announces,delays,wins,streams,remasters,teases|a new console,the expansion pack,a battle royale,the tournament,a retro classic,the multiplayer mode,a role-playing game,the leaderboard|game launch,esports final,console war,patch day,gaming convention,beta weekend|multiplayer,retro,competitive,open-world,indie,next-gen
"""

_PLACES = (
    "Chicago,Denver,Seattle,Boston,Atlanta,Houston,Phoenix,Miami,Dallas,Portland,Detroit,"
    "Nashville,Austin,San Diego,New Orleans,Minneapolis,Baltimore,Cleveland,Orlando,Sacramento"
).split(",")
_SLOTS = ("subjects", "verbs", "objects", "events", "adjectives")
_SYLLABLES = "ka,lo,mi,ru,ze,ta,po,ni,vu,se,dra,ko,fen,lis,mor,qua,bel,tor,gan,sil".split(",")


def generate_mind(config: SyntheticConfig, folder: str) -> dict:
    """Write `behaviors.tsv` and `news.tsv` in MIND format into `folder`; return stats."""
    _check(config)
    storage.makedirs(folder)
    topics = _topics(config.topics, config.seed)
    catalogue = _catalogue(config, topics)

    news_path = storage.join(folder, NEWS)
    with storage.open_binary(news_path, "wb") as handle:
        catalogue.news.write_csv(
            handle, separator="\t", include_header=False, quote_style="never"
        )

    behaviors_path = storage.join(folder, BEHAVIORS)
    totals = dict(rows=0, history_items=0, out_of_range=0, empty_history=0, clicks_from_drift=0)
    with storage.open_binary(behaviors_path, "wb") as handle:
        for chunk, first in enumerate(range(0, config.users, USERS_PER_CHUNK)):
            count = min(USERS_PER_CHUNK, config.users - first)
            frame, chunk_totals = _behaviors_chunk(config, catalogue, chunk, first, count, totals["rows"])
            frame.write_csv(handle, separator="\t", include_header=False, quote_style="never")
            for key, value in chunk_totals.items():
                totals[key] += value

    return {
        "folder": str(folder),
        "users": config.users,
        "items": config.items,
        "topics": config.topics,
        "rows": totals["rows"],
        "impressions_per_row": config.impressions,
        "history_mean": round(totals["history_items"] / config.users, 3),
        "users_history_out_of_range": totals["out_of_range"],
        "users_empty_history": totals["empty_history"],
        "clicks_from_drift_topic": totals["clicks_from_drift"],
        "categories": [topic["category"] for topic in topics],
    }


def _check(config: SyntheticConfig) -> None:
    if config.min_history < 0:
        raise ConfigError(f"synthetic.min_history: {config.min_history} < 0")
    if config.max_history < config.min_history:
        raise ConfigError(
            f"synthetic.max_history ({config.max_history}) < min_history ({config.min_history})"
        )
    if config.items < config.topics:
        raise ConfigError(
            f"synthetic.items ({config.items}) < topics ({config.topics}): every topic needs news"
        )


def _seed(seed: int) -> int:
    """numpy seeds must be >= 0; negative config seeds map to distinct large ones."""
    return seed % (1 << 64)


# ------------------------------------------------------------------------------ topics


def _topics(count: int, seed: int) -> list[dict]:
    """`count` topics: the built-in vocabularies first, then made-up ones."""
    builtin = []
    for line in _TOPICS.strip().splitlines():
        category, subcategories, *slots = line.split("|")
        topic = {"category": category, "subcategories": subcategories.split(",")}
        topic.update({name: words.split(",") for name, words in zip(_SLOTS, slots)})
        builtin.append(topic)
    topics = builtin[:count]
    rng = np.random.default_rng([_seed(seed), 7919])
    for index in range(len(topics), count):
        # A made-up topic: its own invented words, still consistent within the topic.
        def words(n: int, parts: int = 2) -> list[str]:
            picks = rng.integers(0, len(_SYLLABLES), size=(n, parts))
            return ["".join(_SYLLABLES[p] for p in row) for row in picks]

        name = f"topic{index}"
        topic = {"category": name, "subcategories": [f"{name}{c}" for c in "abc"]}
        topic.update({slot: words(8, 3 if slot == "subjects" else 2) for slot in _SLOTS})
        topics.append(topic)
    return topics


# --------------------------------------------------------------------------- catalogue


class _Catalogue:
    def __init__(self, news: pl.DataFrame, item_topic: np.ndarray, keys: np.ndarray,
                 order: np.ndarray, ids: pa.Array, tokens: pa.Array) -> None:
        self.news = news
        self.item_topic = item_topic  # topic of each item (index = item)
        self.keys = keys  # topic + within-topic CDF, ascending (for sampling)
        self.order = order  # items grouped by topic, in the order of `keys`
        self.ids = ids  # news id strings
        self.tokens = tokens  # "<id>-0" for item i at i, "<id>-1" at items + i

    def sample(self, topic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of `topic`, popularity-weighted within the topic."""
        position = np.searchsorted(self.keys, topic + rng.random(topic.shape[0]), side="right")
        return self.order[np.minimum(position, self.order.shape[0] - 1)]


def _catalogue(config: SyntheticConfig, topics: list[dict]) -> _Catalogue:
    rng = np.random.default_rng([_seed(config.seed), 1])
    n = config.items
    item_topic = rng.permutation(np.arange(n) % config.topics).astype(np.int64)
    order = np.argsort(item_topic, kind="stable")
    grouped = item_topic[order]
    starts = np.searchsorted(grouped, np.arange(config.topics))
    rank = np.arange(n) - starts[grouped]
    weights = 1.0 / (rank + 5.0) ** POPULARITY_EXPONENT
    cumulative = np.cumsum(weights)
    before = np.concatenate([[0.0], cumulative])[starts]  # weight before each topic
    totals = np.bincount(grouped, weights=weights, minlength=config.topics)
    keys = grouped + (cumulative - before[grouped]) / totals[grouped]

    sub = rng.integers(0, 3, size=n)
    title = _headlines(topics, item_topic, rng, abstract=False)
    abstract = _headlines(topics, item_topic, rng, abstract=True)
    ids = pl.Series("news_id", np.arange(1, n + 1)).cast(pl.Utf8)
    ids = ("N" + ids).rename("news_id")
    categories = np.array([t["category"] for t in topics], dtype=object)
    subcategories = np.array([t["subcategories"] for t in topics], dtype=object)
    news = pl.DataFrame(
        {
            "news_id": ids,
            "category": pl.Series(categories[item_topic], dtype=pl.Utf8),
            "subcategory": pl.Series(subcategories[item_topic, sub], dtype=pl.Utf8),
            "title": title,
            "abstract": abstract,
        }
    ).with_columns(
        pl.format("https://example.com/synthetic/{}.html", pl.col("news_id")).alias("url"),
        pl.lit("[]").alias("title_entities"),
        pl.lit("[]").alias("abstract_entities"),
    )
    id_array = ids.to_arrow().cast(pa.string())
    tokens = pl.concat([ids + "-0", ids + "-1"]).to_arrow().cast(pa.string())
    return _Catalogue(news, item_topic, keys, order, id_array, tokens)


def _headlines(topics: list[dict], item_topic: np.ndarray, rng: np.random.Generator,
               abstract: bool) -> pl.Series:
    """A title (or a two-sentence abstract) per item from its topic's words."""
    n = item_topic.shape[0]
    words: dict[str, pl.Series] = {}
    for slot in _SLOTS:
        flat = [w for t in topics for w in t[slot]]
        sizes = np.array([len(t[slot]) for t in topics])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for k in range(2 if abstract else 1):
            pick = offsets[item_topic] + rng.integers(0, 1 << 30, size=n) % sizes[item_topic]
            words[f"{slot}{k}"] = pl.Series(np.array(flat, dtype=object)[pick], dtype=pl.Utf8)
    place = pl.Series(np.array(_PLACES, dtype=object)[rng.integers(0, len(_PLACES), size=n)], dtype=pl.Utf8)
    template = rng.integers(0, 6, size=n)
    frame = pl.DataFrame({**words, "place": place, "template": template})
    s, v, o, e, a, p = (pl.col(c) for c in ("subjects0", "verbs0", "objects0", "events0", "adjectives0", "place"))
    if abstract:
        s1, v1, o1, e1 = (pl.col(c) for c in ("subjects1", "verbs1", "objects1", "events1"))
        text = pl.concat_str(
            [s, v, o, pl.lit("as the"), e, pl.lit("in"), p + pl.lit(" continues."),
             pl.lit("Meanwhile the"), s1, v1, o1, pl.lit("ahead of the"), a, e1 + pl.lit(".")],
            separator=" ",
        )
    else:
        text = (
            pl.when(pl.col("template") == 0).then(pl.concat_str([s, v, o], separator=" "))
            .when(pl.col("template") == 1).then(pl.concat_str([s, v, o, pl.lit("in"), p], separator=" "))
            .when(pl.col("template") == 2).then(pl.concat_str([a, s, v, o], separator=" "))
            .when(pl.col("template") == 3).then(pl.concat_str([s, v, o, pl.lit("after"), e], separator=" "))
            .when(pl.col("template") == 4).then(
                pl.concat_str([pl.lit("What the"), a, e, pl.lit("means for"), o], separator=" ")
            )
            .otherwise(pl.concat_str([p + pl.lit(":"), s, v, o], separator=" "))
        )
    text = text.alias("text")
    capitalised = pl.col("text").str.slice(0, 1).str.to_uppercase() + pl.col("text").str.slice(1)
    return frame.select(text).select(capitalised.alias("abstract" if abstract else "title")).to_series()


# --------------------------------------------------------------------------- behaviors


def _distinct_topics(rng: np.random.Generator, users: int, topics: int, draws: int) -> np.ndarray:
    """users x draws distinct topics per user (draws <= topics), uniformly at random."""
    chosen = np.empty((users, draws), dtype=np.int64)
    for k in range(draws):
        value = rng.integers(0, topics - k, size=users)
        # Skip the topics already chosen (in ascending order) to keep draws distinct.
        previous = np.sort(chosen[:, :k], axis=1)
        for j in range(k):
            value += value >= previous[:, j]
        chosen[:, k] = value
    return chosen


def _behaviors_chunk(config: SyntheticConfig, catalogue: _Catalogue, chunk: int, first: int,
                     users: int, rows_before: int) -> tuple[pl.DataFrame, dict]:
    rng = np.random.default_rng([_seed(config.seed), 2, chunk])
    n_topics = config.topics

    # Users: long-term interests (1-3 topics, random weights) and a drift topic.
    draws = min(4, n_topics)
    picked = _distinct_topics(rng, users, n_topics, draws)
    n_interests = np.minimum(rng.choice([1, 2, 3], size=users, p=[0.3, 0.4, 0.3]), draws - 1)
    drift = picked[np.arange(users), n_interests]
    weights = rng.gamma(1.0, size=(users, 3)) * (np.arange(3) < n_interests[:, None])
    cumulative = np.cumsum(weights, axis=1)
    cumulative /= cumulative[:, -1:]

    # History lengths: uniform in range, about 5% outside it.
    lo, hi = config.min_history, config.max_history
    length = rng.integers(lo, hi + 1, size=users)
    outside = rng.random(users) < OUT_OF_RANGE_SHARE
    shorter = outside & (rng.random(users) < 0.5) & (lo > 0)
    longer = outside & ~shorter
    length[shorter] = rng.integers(0, max(lo, 1), size=int(shorter.sum()))
    length[longer] = rng.integers(hi + 1, 2 * hi + 2, size=int(longer.sum()))

    # History items: later positions lean toward the drift topic.
    owner = np.repeat(np.arange(users), length)
    starts = np.concatenate([[0], np.cumsum(length)[:-1]])
    position = np.arange(owner.shape[0]) - starts[owner]
    progress = (position + 1) / np.maximum(length[owner], 1)
    from_drift = rng.random(owner.shape[0]) < DRIFT_MAX * progress**2
    topic = _topic_of(picked, cumulative, drift, owner, from_drift, rng)
    history_items = catalogue.sample(topic, rng)
    history = pc.binary_join(
        pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum(length)]).astype(np.int32)),
            catalogue.ids.take(pa.array(history_items)),
        ),
        " ",
    )

    # Impression rows: increasing times, one click from current interests, random others.
    per_user = config.rows_per_user
    rows = users * per_user
    row_owner = np.repeat(np.arange(users), per_user)
    start = START + rng.integers(0, SPAN_SECONDS // 2, size=users)
    gaps = rng.integers(60, 12 * 3600, size=(users, per_user))
    gaps[:, 0] = 0
    times = (start[:, None] + np.cumsum(gaps, axis=1)).reshape(-1)
    click_drift = rng.random(rows) < CLICK_DRIFT
    click = catalogue.sample(_topic_of(picked, cumulative, drift, row_owner, click_drift, rng), rng)
    k = config.impressions
    negatives = (click[:, None] + 1 + rng.integers(0, config.items - 1, size=(rows, k))) % config.items
    slot = rng.integers(0, k, size=rows)
    negatives[np.arange(rows), slot] = click + config.items  # the "-1" token
    impressions = pc.binary_join(
        pa.ListArray.from_arrays(
            pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32)),
            catalogue.tokens.take(pa.array(negatives.reshape(-1))),
        ),
        " ",
    )

    # File order: by time (users interleave, as in MIND), ties by user.
    file_order = np.lexsort((row_owner, times))
    frame = pl.DataFrame(
        {
            "impression_id": np.arange(rows_before + 1, rows_before + rows + 1),
            "user_id": pl.Series(row_owner[file_order] + first + 1).cast(pl.Utf8),
            "time": pl.from_epoch(pl.Series(times[file_order]), time_unit="s"),
            "history": pl.from_arrow(history.take(pa.array(row_owner[file_order]))),
            "impressions": pl.from_arrow(impressions.take(pa.array(file_order))),
        }
    ).with_columns(
        ("U" + pl.col("user_id")).alias("user_id"),
        pl.col("time").dt.strftime(TIME_FORMAT),
    )
    totals = dict(
        rows=rows,
        history_items=int(length.sum()),
        out_of_range=int(((length < lo) | (length > hi)).sum()),
        empty_history=int((length == 0).sum()),
        clicks_from_drift=int(click_drift.sum()),
    )
    return frame, totals


def _topic_of(picked: np.ndarray, cumulative: np.ndarray, drift: np.ndarray, owner: np.ndarray,
              from_drift: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The topic of each draw: the owner's drift topic, else one of their interests."""
    u = rng.random(owner.shape[0])
    interest = (u[:, None] >= cumulative[owner]).sum(axis=1)
    interest = np.minimum(interest, 2)
    long_term = picked[owner, interest]
    return np.where(from_drift, drift[owner], long_term)

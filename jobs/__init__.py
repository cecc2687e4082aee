"""Ray job entry points: `python -m jobs.<name> --config ...` (also under `ray job submit`).

Each module is a thin wrapper over the `trsr` CLI; the logic lives in the library.
"""

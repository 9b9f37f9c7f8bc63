"""``python -m looppool``: the command line (see :mod:`looppool._cli`)."""

# The import stays under the guard: a worker started with "spawn" re-imports
# this module as ``__mp_main__`` and should not pay for the command line.
if __name__ == "__main__":
    from looppool._cli import main

    raise SystemExit(main())

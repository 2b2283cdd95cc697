"""``python -m zolm ...`` is the ``zolm`` command."""

from zolm.cli import main

if __name__ == "__main__":
    main()

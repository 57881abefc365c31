"""``python -m lsdtool`` is the ``lsd`` command (what ``torchrun -m lsdtool`` runs)."""

from lsdtool.cli import main

if __name__ == "__main__":
    main(prog_name="lsd")

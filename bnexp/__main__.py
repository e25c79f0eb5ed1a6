"""``python -m bnexp``: the bnexp command, so that ``torchrun --nproc_per_node=N -m bnexp train ...``
(which starts each process as ``python -m bnexp``) runs a data-parallel run."""

from bnexp.cli import main

if __name__ == "__main__":
    main()

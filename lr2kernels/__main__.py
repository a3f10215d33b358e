"""``python -m lr2kernels`` (and ``torchrun -m lr2kernels``) runs the command line."""

from lr2kernels.apps.cli import main

raise SystemExit(main())

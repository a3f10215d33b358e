"""``python -m lr2kernels`` runs the command line."""

from lr2kernels.cli import main

raise SystemExit(main())

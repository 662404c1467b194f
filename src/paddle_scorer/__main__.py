"""`python -m paddle_scorer` is `paddle-scorer`."""

from paddle_scorer.cli.app import main

main()

from paddle_scorer.cli.app import main

main()

"""PaddleFormers 1.2.0 reference checkpoints and tests (run under .venv-formers; see notes/paddleformers.md)."""

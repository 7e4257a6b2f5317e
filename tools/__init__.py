"""The book's build tools (run from the repository root as `python -m tools.build_site`, `python -m tools.make_readme`)."""

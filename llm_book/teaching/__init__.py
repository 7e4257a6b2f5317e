"""Teaching helpers: test-data generators, plots and demos used by the chapters and tests. No runtime module imports this package."""

"""Reference implementations the tests and the benchmark compare the models with."""

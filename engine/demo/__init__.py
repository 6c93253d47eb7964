"""The built-in shapes dataset that ``make demo`` trains on and ``engine.eval_demo`` scores."""

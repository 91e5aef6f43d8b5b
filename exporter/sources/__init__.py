"""Where records come from besides HTTP: history files (replay, backtest), followed files, demo traffic."""

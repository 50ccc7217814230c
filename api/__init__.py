"""The merchant feed API: balances, history and a live cash-flow stream per merchant."""

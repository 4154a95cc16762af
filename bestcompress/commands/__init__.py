"""Click commands, one module per area; each module exports COMMANDS, a list that cli.py registers."""

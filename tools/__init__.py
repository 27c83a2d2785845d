"""Command-line tools: thin argparse front ends over functions the tests call directly."""

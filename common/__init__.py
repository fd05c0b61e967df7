"""What every package shares and that imports no other package of the project: names, errors."""

"""The one exception type for a problem with the training data."""


class DataError(ValueError):
  """A path that matches nothing, a record that does not parse, a split too small, a damaged
  shard: the message is one line naming the file and, where known, the line or record. The
  entry points report it and exit with code 2."""

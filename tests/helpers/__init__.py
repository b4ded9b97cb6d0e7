"""What several test modules share: server wrappers run as processes, reference models, records, metrics."""

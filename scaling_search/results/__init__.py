"""From trials to the answer: ranking and statistics, the winner in words, the family, its
documents."""

"""From finished target runs to every strategy of Table 1 and its analyses."""

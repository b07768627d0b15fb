"""Process groups, parallel state, seeding, and the CPU redirection for machines without a GPU."""

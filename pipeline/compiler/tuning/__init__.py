"""MetaSchedule tuning: the budget and the order of its turns (`control`), builds in forked processes
(`forked_builds`), latency against trials (`curve`), the search and the tuned build (`search`), and timing
candidates on the board itself over the session the orchestrator hands in (`board`)."""

"""MetaSchedule tuning: the budget and the order of its turns (`control`), builds in forked processes
(`forked_builds`), latency against trials (`curve`), tensor intrinsics (`intrinsics`), and timing candidates on the
board itself over a tunnel (`board`)."""

"""Training: prepared cases, the prompter and student trainings, the foundation cache, losses."""

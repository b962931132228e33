"""The training method: the loop (trainer), evaluation, EMA and MESA."""

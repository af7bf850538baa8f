"""Time: when a scheduled send is due (pure maths) and the periodic jobs beat drives."""

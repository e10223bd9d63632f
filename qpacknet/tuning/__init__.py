"""Tuning the method's settings with Ray Tune: the space (``space``), one trial (``trial``),
the experiment (``runner``) and the accuracy-vs-capacity Pareto table (``pareto``)."""

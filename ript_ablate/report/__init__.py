"""Reports of a study: collect (MLflow -> pandas), stats (rliable methods), analysis, plots, render."""

"""Analyses that read what the stages wrote (path kernel, eigen-features, adversarial examples, persistence, report);
each adds its own group to the run file."""

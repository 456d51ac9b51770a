"""Checkpoints under version control with git-theta: read any revision, merge with `git merge`, commit merges.

Set a repository up with `python3 -m blockmerge.gittheta install` (see `blockmerge.gittheta.install`).
Nothing here is imported by `import blockmerge`; git-theta's plugin loader imports only the light modules.
"""

"""Revisions: the one commit path, history, diff and revert.

- `record`: `RevisionRecord` (what `revision.json` holds) and `RevisionDraft`,
  which every mutation fills in and only the commit path turns into a record
- `commit`: `Change` and `commit_change`, the one way a revision becomes
  durable and then visible
- `history`: listing and reading revisions
- `diff`, `revert`: DiffRevisions and RevertModel
"""

"""Pure decisions: the rules, the resolver (explicit > profile > rules), the search."""

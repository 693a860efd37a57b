"""The rules table (rules/table.toml), its loader, and the pure routing decision."""

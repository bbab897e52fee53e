"""The topology file: schema.py (the models), load.py (file -> Topology), checks.py (cross-field
rules), profile.py (sim profiles), yamlmarks.py (YAML with lines), simflags.py (the sim's flags).

Deliberately empty: importing one of them must not import the others (`plan` imports schema.py
only, and the sim imports simflags.py, which is standard library only)."""

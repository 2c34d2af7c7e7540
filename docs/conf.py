# Sphinx configuration of kvmsys's reference documentation: built from the docstrings of
# the installed package (the compiled core embeds its signatures) by autodoc.
#   sphinx-build -W -b html docs docs/_build/html      (CI runs it; warnings are errors)
import kvmsys

project = "kvmsys"
author = "the kvmsys authors"
copyright = "2026, the kvmsys authors"
release = version = kvmsys.__version__

extensions = ["sphinx.ext.autodoc"]
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_docstring_signature = True      # Cython's embedded signatures
autodoc_typehints = "signature"
autoclass_content = "class"
default_role = "literal"                # `name` in docstrings is code, as in README
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]

"""GPU check kit (issue 11): what to run on a bare GPU node lent for a few minutes. See README.md."""

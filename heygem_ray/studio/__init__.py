"""The studio: a web front end for the people who make the videos (`heygem-ray studio`)."""

"""Learning on the line: enrolment of a camera's recent good frames into a candidate model version."""

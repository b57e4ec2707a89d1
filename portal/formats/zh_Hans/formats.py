"""Simplified Chinese number formats of the persons' pages; everything else comes from Django's zh_Hans.

Amounts are grouped by thousands with commas (12,345 积分), as Chinese banks' and payment apps show them,
rather than Django's default for the locale (by ten thousand, with no separator).
"""

THOUSAND_SEPARATOR = ","
NUMBER_GROUPING = 3

"""The one error type conversion raises for bad input."""


class ConversionError(ValueError):
    """Input a conversion cannot handle; the message names the file or flag and the fix."""

"""Python code generated from proto/ by `make proto`; never edit the *_pb2 files by hand."""

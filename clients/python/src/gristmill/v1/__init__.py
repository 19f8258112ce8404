"""Generated gRPC API of gristmill (package gristmill.v1). Do not edit."""

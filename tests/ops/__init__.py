"""Op tests: each torch.ops.neurokern op against neurokern.ops.reference (a package, so that module
names such as test_dare do not collide with tests/methods/ and helpers import as .conftest)."""

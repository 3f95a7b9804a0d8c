//! Compile-time guarantees of the flow DSL, as trybuild snapshots: `tests/ui/pass` must compile
//! (and run), `tests/ui/fail` must fail with the committed `.stderr`. Regenerate snapshots with
//! `TRYBUILD=overwrite cargo test --test compiletest`, then read every one of them.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}

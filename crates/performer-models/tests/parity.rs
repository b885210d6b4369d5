//! Every committed fixture (fixtures/, generated from performer-pytorch 1.1.4 by
//! tools/gen_fixtures.py) passes FIXTURES.md's tolerances.

use std::path::PathBuf;

use performer_models::parity::{find_fixtures, run_fixture};

#[test]
fn all_fixtures_match_performer_pytorch() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let dirs = find_fixtures(&[root]).unwrap();
    assert!(dirs.len() >= 40, "expected the committed fixtures, found {}", dirs.len());
    let mut failed = Vec::new();
    for d in &dirs {
        let r = run_fixture(d);
        println!("{r}");
        if !r.passed {
            failed.push(r.name);
        }
    }
    assert!(failed.is_empty(), "{} of {} fixtures failed: {failed:?}", failed.len(), dirs.len());
}

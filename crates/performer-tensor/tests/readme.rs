//! The README's performer-tensor example is `examples/tensor_basics.rs`, verbatim after the
//! example's crate doc (the `//!` lines, which the README says in prose), so that it compiles
//! (cargo test builds the examples) and stays current.

#[test]
fn readme_example_is_the_tensor_basics_example() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/tensor_basics.rs"
    ))
    .unwrap();
    let code: String = example
        .split_inclusive('\n')
        .skip_while(|l| l.starts_with("//!"))
        .skip_while(|l| l.trim().is_empty())
        .collect();
    assert!(
        code.len() < example.len(),
        "the example's crate doc is missing"
    );
    let example = code;
    assert!(
        readme.contains(&format!("```rust\n{example}```")),
        "README.md must quote crates/performer-tensor/examples/tensor_basics.rs in a ```rust block, verbatim"
    );
}

//! The import graph of one crate's modules, read from its source files.
//!
//! A node is a module with a file of its own (an inline module such as `mod tests` belongs to
//! its file). An edge A -> B is a `use` in A, or a path in A's code (`crate::b::f()`,
//! `super::b::T`, `child::f()`), naming an item that B defines. Re-exports are followed to the
//! module that defines the item, so `use crate::Error` is an edge to `error`, not to the crate
//! root that re-exports it (the re-export is an edge of the root). `mod` declarations are not
//! imports; paths into other crates are ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::lexer::{Tok, Token, tokenize};

/// A module path inside the crate, `[]` for the root.
pub type ModPath = Vec<String>;

/// Why an edge exists: one import that makes it.
#[derive(Clone, Debug)]
pub struct Evidence {
    /// The importing file, relative to the crate's `src`.
    pub file: PathBuf,
    /// The line of the import.
    pub line: usize,
    /// The path as resolved from the crate root.
    pub path: String,
}

/// One crate's file modules and the imports between them.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    /// Every file module, with the modules it imports and one piece of evidence for each.
    pub edges: BTreeMap<ModPath, BTreeMap<ModPath, Evidence>>,
}

/// What a module declares and brings into scope.
#[derive(Debug, Default)]
struct Scope {
    children: BTreeSet<String>,
    items: BTreeSet<String>,
    /// `use a::b as c`: `c` -> `a::b`, from the crate root.
    aliases: HashMap<String, ModPath>,
    /// `use a::b::*`: `a::b`, from the crate root.
    globs: Vec<ModPath>,
}

/// A path found in a module, from the crate root, with its line.
struct Reference {
    from: ModPath,
    path: ModPath,
    line: usize,
}

/// One leaf of a use tree: its path as written, the name it binds (if any), whether a glob.
struct UseLeaf {
    segs: Vec<String>,
    name: Option<String>,
    glob: bool,
}

/// The module of a file: `lib.rs`/`main.rs` the root, `a/b.rs` and `a/b/mod.rs` `a::b`.
fn module_path(rel: &Path) -> Option<ModPath> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return Some(Vec::new());
    }
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    Some(parts)
}

/// Every `.rs` file under `dir`, sorted, without `src/bin` (crates of their own).
fn rust_files(dir: &Path, top: bool, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let mut paths = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        paths.push(e.map_err(|e| format!("{}: {e}", dir.display()))?.path());
    }
    paths.sort();
    for p in paths {
        if p.is_dir() {
            if !(top && p.file_name().is_some_and(|n| n == "bin")) {
                rust_files(&p, false, out)?;
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads the crate whose sources are under `src` and builds its graph.
pub fn scan(src: &Path) -> Result<ModuleGraph, String> {
    let mut files = Vec::new();
    rust_files(src, true, &mut files)?;
    let mut sources: Vec<(ModPath, PathBuf, Vec<Token>)> = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src).unwrap_or(f).to_path_buf();
        let Some(module) = module_path(&rel) else {
            continue;
        };
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        sources.push((module, rel, tokenize(&text)));
    }
    let file_of: HashMap<ModPath, PathBuf> = sources
        .iter()
        .map(|(m, rel, _)| (m.clone(), rel.clone()))
        .collect();

    // 1: the modules and items every file declares.
    let mut scopes: HashMap<ModPath, Scope> = HashMap::new();
    for (module, _, tokens) in &sources {
        declare(module, tokens, &mut scopes);
    }
    // 2: every `use`, which also binds names (a later path may start with one).
    let mut references = Vec::new();
    let mut bindings = Vec::new();
    for (module, _, tokens) in &sources {
        for (m, leaf, line) in uses(module, tokens) {
            let Some(path) = from_root(&m, &leaf.segs, &scopes) else {
                continue;
            };
            references.push(Reference {
                from: m.clone(),
                path: path.clone(),
                line,
            });
            bindings.push((m, leaf, path));
        }
    }
    for (m, leaf, path) in bindings {
        let scope = scopes.entry(m).or_default();
        if leaf.glob {
            scope.globs.push(path);
        } else if let Some(name) = leaf.name {
            scope.aliases.insert(name, path);
        }
    }
    // 3: qualified paths in code.
    for (module, _, tokens) in &sources {
        for (m, segs, line) in code_paths(module, tokens) {
            if let Some(path) = from_root(&m, &segs, &scopes) {
                references.push(Reference {
                    from: m,
                    path,
                    line,
                });
            }
        }
    }

    let mut graph = ModuleGraph::default();
    for module in file_of.keys() {
        graph.edges.entry(module.clone()).or_default();
    }
    for r in references {
        let from = file_module(&r.from, &file_of);
        let (target, _) = resolve(&r.path, &scopes, 0);
        let to = file_module(&target, &file_of);
        if to == from {
            continue;
        }
        let evidence = Evidence {
            file: file_of.get(&from).cloned().unwrap_or_default(),
            line: r.line,
            path: r.path.join("::"),
        };
        graph
            .edges
            .entry(from)
            .or_default()
            .entry(to)
            .or_insert(evidence);
    }
    Ok(graph)
}

/// The file a module lives in: its own, or the file that holds it inline.
fn file_module(m: &ModPath, files: &HashMap<ModPath, PathBuf>) -> ModPath {
    let mut m = m.clone();
    while !files.contains_key(&m) && !m.is_empty() {
        m.pop();
    }
    m
}

/// A cursor over a file's tokens that knows which inline module it is in.
struct Cursor<'a> {
    tokens: &'a [Token],
    i: usize,
    depth: usize,
    /// Inline modules entered: name, and the brace depth of their items.
    inline: Vec<(String, usize)>,
}

impl<'a> Cursor<'a> {
    fn new(tokens: &'a [Token]) -> Self {
        Cursor {
            tokens,
            i: 0,
            depth: 0,
            inline: Vec::new(),
        }
    }

    fn ident(&self, at: usize) -> Option<&'a str> {
        match self.tokens.get(at).map(|t| &t.tok) {
            Some(Tok::Ident(s)) => Some(s),
            _ => None,
        }
    }

    fn is(&self, at: usize, t: Tok) -> bool {
        self.tokens.get(at).map(|x| &x.tok) == Some(&t)
    }

    fn done(&self) -> bool {
        self.i >= self.tokens.len()
    }

    /// The module of the current token, `file` being the file's.
    fn module(&self, file: &ModPath) -> ModPath {
        let mut m = file.clone();
        m.extend(self.inline.iter().map(|(n, _)| n.clone()));
        m
    }

    /// Whether the current token sits where the current module's items do.
    fn at_item_level(&self) -> bool {
        self.depth == self.inline.last().map_or(0, |&(_, d)| d)
    }

    /// Steps over the current token, following braces into and out of inline modules.
    fn step(&mut self) {
        match self.tokens[self.i].tok {
            Tok::Punct('{') => {
                self.depth += 1;
                if self.i >= 2
                    && self.ident(self.i - 2) == Some("mod")
                    && let Some(name) = self.ident(self.i - 1)
                {
                    self.inline.push((name.to_string(), self.depth));
                }
            }
            Tok::Punct('}') => {
                if self.inline.last().is_some_and(|&(_, d)| d == self.depth) {
                    self.inline.pop();
                }
                self.depth = self.depth.saturating_sub(1);
            }
            _ => {}
        }
        self.i += 1;
    }
}

const ITEM_KEYWORDS: &[&str] = &[
    "fn", "struct", "enum", "trait", "type", "const", "static", "union",
];

/// Pass 1: the child modules and items of every module in a file.
fn declare(file: &ModPath, tokens: &[Token], scopes: &mut HashMap<ModPath, Scope>) {
    scopes.entry(file.clone()).or_default();
    if let Some((name, parent)) = file.split_last() {
        scopes
            .entry(parent.to_vec())
            .or_default()
            .children
            .insert(name.clone());
    }
    let mut c = Cursor::new(tokens);
    while !c.done() {
        if c.at_item_level()
            && let Some(kw) = c.ident(c.i)
        {
            let module = c.module(file);
            let next = c.ident(c.i + 1).map(str::to_string);
            match (kw, next) {
                ("mod", Some(name)) => {
                    let mut child = module.clone();
                    child.push(name.clone());
                    scopes.entry(child).or_default();
                    scopes.entry(module).or_default().children.insert(name);
                }
                ("macro_rules", _) if c.is(c.i + 1, Tok::Punct('!')) => {
                    if let Some(name) = c.ident(c.i + 2) {
                        scopes
                            .entry(module)
                            .or_default()
                            .items
                            .insert(name.to_string());
                    }
                }
                (kw, Some(name)) if ITEM_KEYWORDS.contains(&kw) && name != "fn" && name != "_" => {
                    scopes.entry(module).or_default().items.insert(name);
                }
                _ => {}
            }
        }
        c.step();
    }
}

/// A path as written in `module`, from the crate root: `crate::`, `self::`, `super::` (any
/// number), a child module or a name a `use` bound; `None` for other crates.
fn from_root(
    module: &ModPath,
    segs: &[String],
    scopes: &HashMap<ModPath, Scope>,
) -> Option<ModPath> {
    let (first, mut rest) = segs.split_first()?;
    let mut base = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.clone(),
        "super" => module[..module.len().checked_sub(1)?].to_vec(),
        name => {
            let scope = scopes.get(module)?;
            if scope.children.contains(name) {
                let mut m = module.clone();
                m.push(name.to_string());
                m
            } else {
                scope.aliases.get(name)?.clone()
            }
        }
    };
    while let Some((s, r)) = rest.split_first() {
        if s != "super" {
            break;
        }
        base.pop();
        rest = r;
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// Every `use` of a file: the module it is in, each leaf of its tree, its line.
fn uses(file: &ModPath, tokens: &[Token]) -> Vec<(ModPath, UseLeaf, usize)> {
    let mut out = Vec::new();
    let mut c = Cursor::new(tokens);
    while !c.done() {
        if c.ident(c.i) == Some("use") && c.i.checked_sub(1).is_none_or(|p| !c.is(p, Tok::PathSep))
        {
            let module = c.module(file);
            let line = tokens[c.i].line;
            let mut leaves = Vec::new();
            // A use tree's braces balance, so jumping over it leaves the depth as it was.
            c.i = use_tree(&c, c.i + 1, &mut Vec::new(), &mut leaves);
            out.extend(leaves.into_iter().map(|l| (module.clone(), l, line)));
            continue;
        }
        c.step();
    }
    out
}

/// Parses the use tree at token `i` under `prefix`; returns the index after it.
fn use_tree(
    c: &Cursor<'_>,
    mut i: usize,
    prefix: &mut Vec<String>,
    leaves: &mut Vec<UseLeaf>,
) -> usize {
    if c.is(i, Tok::PathSep) {
        // `::std::x` names another crate; a segment no module has keeps it unresolved.
        prefix.push("::".into());
        i += 1;
    }
    while let Some(s) = c.ident(i) {
        if !c.is(i + 1, Tok::PathSep) {
            break;
        }
        prefix.push(s.to_string());
        i += 2;
    }
    if let Some(s) = c.ident(i) {
        let mut segs = prefix.clone();
        segs.push(s.to_string());
        i += 1;
        let mut name = Some(s.to_string());
        if segs.last().is_some_and(|l| l == "self") {
            segs.pop();
            name = segs.last().cloned();
        }
        if c.ident(i) == Some("as") {
            name = c.ident(i + 1).filter(|&n| n != "_").map(str::to_string);
            i += 2;
        }
        leaves.push(UseLeaf {
            segs,
            name,
            glob: false,
        });
    } else if c.is(i, Tok::Punct('*')) {
        leaves.push(UseLeaf {
            segs: prefix.clone(),
            name: None,
            glob: true,
        });
        i += 1;
    } else if c.is(i, Tok::Punct('{')) {
        i += 1;
        while i < c.tokens.len() && !c.is(i, Tok::Punct('}')) {
            i = use_tree(c, i, &mut prefix.clone(), leaves);
            if c.is(i, Tok::Punct(',')) {
                i += 1;
            }
        }
        i += 1;
    }
    i
}

/// Every qualified path in a file's code (outside `use`): module, segments, line.
fn code_paths(file: &ModPath, tokens: &[Token]) -> Vec<(ModPath, Vec<String>, usize)> {
    let mut out = Vec::new();
    let mut c = Cursor::new(tokens);
    while !c.done() {
        let after_sep = c.i.checked_sub(1).is_some_and(|p| c.is(p, Tok::PathSep));
        if c.ident(c.i) == Some("use") && !after_sep {
            while !c.done() && !c.is(c.i, Tok::Punct(';')) {
                c.i += 1;
            }
            continue;
        }
        if c.ident(c.i).is_some() && c.is(c.i + 1, Tok::PathSep) && !after_sep {
            let module = c.module(file);
            let line = tokens[c.i].line;
            let mut segs = Vec::new();
            let mut i = c.i;
            while let Some(s) = c.ident(i) {
                segs.push(s.to_string());
                if c.is(i + 1, Tok::PathSep) && c.ident(i + 2).is_some() {
                    i += 2;
                } else {
                    break;
                }
            }
            out.push((module, segs, line));
            while c.i <= i {
                c.step();
            }
            continue;
        }
        c.step();
    }
    out
}

/// The module that defines what `path` names, following re-exports and globs, and whether the
/// last name was found at all (a method or variant is not, and resolves to its type's module).
fn resolve(path: &[String], scopes: &HashMap<ModPath, Scope>, depth: usize) -> (ModPath, bool) {
    let mut module: ModPath = Vec::new();
    if depth > 32 {
        return (module, false);
    }
    for (k, seg) in path.iter().enumerate() {
        let Some(scope) = scopes.get(&module) else {
            return (module, false);
        };
        if scope.children.contains(seg) {
            module.push(seg.clone());
            continue;
        }
        if scope.items.contains(seg) {
            return (module, true);
        }
        if let Some(target) = scope.aliases.get(seg) {
            let mut rest = target.clone();
            rest.extend(path[k + 1..].iter().cloned());
            return resolve(&rest, scopes, depth + 1);
        }
        for g in &scope.globs {
            let mut rest = g.clone();
            rest.extend(path[k..].iter().cloned());
            let (m, found) = resolve(&rest, scopes, depth + 1);
            if found {
                return (m, true);
            }
        }
        return (module, false);
    }
    (module, true)
}

/// The cycles of a graph: its strongly connected components of more than one module.
pub fn cycles(graph: &ModuleGraph) -> Vec<Vec<ModPath>> {
    // Tarjan's algorithm, iterative over a node index.
    let nodes: Vec<&ModPath> = graph.edges.keys().collect();
    let index_of: HashMap<&ModPath, usize> =
        nodes.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let succ: Vec<Vec<usize>> = nodes
        .iter()
        .map(|m| {
            graph.edges[*m]
                .keys()
                .filter_map(|t| index_of.get(t).copied())
                .collect()
        })
        .collect();
    let n = nodes.len();
    let (mut index, mut low, mut on_stack) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let (mut stack, mut next, mut out) = (Vec::new(), 0, Vec::new());
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut work = vec![(root, 0usize)];
        while let Some(&mut (v, ref mut child)) = work.last_mut() {
            if *child == 0 && index[v] == usize::MAX {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if let Some(&w) = succ[v].get(*child) {
                *child += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(nodes[w].clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    out.push(component);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph_of(files: &[(&str, &str)]) -> ModuleGraph {
        let dir =
            std::env::temp_dir().join(format!("xtask-tidy-{}-{}", std::process::id(), files.len()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let g = scan(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        g
    }

    fn names(c: &[ModPath]) -> Vec<String> {
        c.iter().map(|m| m.join("::")).collect()
    }

    #[test]
    fn a_circle_through_a_reexport_is_found() {
        let g = graph_of(&[
            ("lib.rs", "mod a; mod b; pub use a::A;"),
            ("a.rs", "use crate::b::B; pub struct A;"),
            // Through the root's re-export: an edge to `a`, where A is defined.
            ("b.rs", "pub struct B; fn f() -> crate::A { todo!() }"),
        ]);
        assert_eq!(
            cycles(&g).iter().map(|c| names(c)).collect::<Vec<_>>(),
            [["a", "b"]]
        );
    }

    #[test]
    fn one_way_imports_comments_and_tests_make_no_circle() {
        let g = graph_of(&[
            ("lib.rs", "mod a; mod b; pub use a::A; pub use b::*;"),
            (
                "a.rs",
                "/// [`crate::b::B`] is only a doc link\npub struct A; #[cfg(test)] mod tests { use super::*; }",
            ),
            (
                "b.rs",
                "use crate::A; pub struct B(A); const S: &str = \"crate::b\";",
            ),
        ]);
        assert!(cycles(&g).is_empty(), "{:?}", cycles(&g));
        assert!(g.edges[&vec!["b".to_string()]].contains_key(&vec!["a".to_string()]));
        assert!(!g.edges[&vec!["a".to_string()]].contains_key(&vec!["b".to_string()]));
    }

    #[test]
    fn parent_and_child_through_super_and_globs() {
        let g = graph_of(&[
            ("lib.rs", "mod ops;"),
            (
                "ops/mod.rs",
                "mod m; pub use m::*; pub(crate) fn helper() {}",
            ),
            ("ops/m.rs", "pub fn f() { super::helper() }"),
        ]);
        assert_eq!(
            cycles(&g).iter().map(|c| names(c)).collect::<Vec<_>>(),
            [["ops", "ops::m"]]
        );
    }
}

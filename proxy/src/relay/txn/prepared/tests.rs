//! The prepared statements' server names.

use super::*;

#[test]
fn server_names_depend_on_sql_and_types_only() {
    let a = StmtDef::new(Bytes::from_static(b"select $1"), vec![23]);
    let b = StmtDef::new(Bytes::from_static(b"select $1"), vec![23]);
    let c = StmtDef::new(Bytes::from_static(b"select $1"), vec![25]);
    let d = StmtDef::new(Bytes::from_static(b"select $2"), vec![23]);
    assert_eq!(a.server_name, b.server_name);
    assert_ne!(a.server_name, c.server_name);
    assert_ne!(a.server_name, d.server_name);
    assert!(a.server_name.len() < 64, "fits NAMEDATALEN");
    assert_ne!(&a.server_name[..], NOOP_NAME);
}

//! `inline`: a small member list written in the resource itself.

use futures::stream;

use super::{BATCH_ROWS, BatchBuilder, MemberSource, MemberStream};
use crate::api::InlineSource;
use crate::domain::identifiers::{IdentifierFields, Value};

#[derive(Debug)]
pub struct InlineMembers {
    rows: Vec<std::collections::BTreeMap<String, String>>,
    fields: IdentifierFields,
}

impl InlineMembers {
    pub fn new(spec: &InlineSource, fields: IdentifierFields) -> Self {
        InlineMembers { rows: spec.rows.clone(), fields }
    }
}

impl MemberSource for InlineMembers {
    fn describe(&self) -> String {
        format!("inline list ({} rows)", self.rows.len())
    }

    fn members(&self) -> MemberStream<'_> {
        let batches = self.rows.chunks(BATCH_ROWS).map(|rows| {
            let mut batch = BatchBuilder::default();
            for row in rows {
                batch.push(self.fields.resolve(|name| row.get(name).map_or(Value::Null, |v| Value::text(v))));
            }
            Ok(batch.take())
        });
        Box::pin(stream::iter(batches))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AliasMapping, IdentifierMapping};
    use crate::domain::identifiers::SkipReason;
    use crate::domain::member::Member;
    use crate::source::read_cohort;

    #[tokio::test]
    async fn inline_rows_resolve_and_duplicates_collapse() {
        let rows = serde_json::from_value(serde_json::json!({"rows": [
            {"uid": "u1"}, {"uid": "u1"}, {"email": "a@b"}, {"uid": ""}, {"device": "d1"}
        ]}))
        .unwrap();
        let fields = IdentifierFields::from_mapping(&IdentifierMapping {
            external_id: Some("uid".into()),
            alias: Some(AliasMapping { name_field: "email".into(), label: Some("email".into()), label_field: None }),
            device_id: Some("device".into()),
        })
        .unwrap();
        let source = InlineMembers::new(&rows, fields);
        let read = read_cohort(&source).await.unwrap();
        let members: Vec<Member> = read.members.iter().map(|k| k.member().unwrap()).collect();
        assert_eq!(
            members,
            vec![
                Member::ExternalId("u1".into()),
                Member::Alias { name: "a@b".into(), label: "email".into() },
                Member::DeviceId("d1".into()),
            ]
        );
        assert_eq!(read.duplicates, 1);
        assert_eq!(read.skipped.get(SkipReason::Missing), 1);
        assert_eq!(read.rows, 5);
        assert_eq!(source.describe(), "inline list (5 rows)");
    }
}

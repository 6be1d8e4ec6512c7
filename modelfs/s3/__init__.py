"""Everything that talks to S3 through boto3, and nothing else does.

* `settings`: how to reach one endpoint (built by `modelfs.config`);
* `client`: the one place boto3 sessions and clients are made;
* `errors`: every botocore failure sorted into a domain error, retryable
  or not, with its metric label;
* `origin`: the origin store (`S3Store`), the `modelfs.store.ObjectStore`
  of a mount, a pull and `modelfs snapshot`;
* `tier_bucket`: the shared tier's bucket (`S3Tier`).

Importing this package imports no boto3: its modules do, when used.
"""

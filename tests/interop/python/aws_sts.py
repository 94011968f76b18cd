"""AWS SDK (boto3/botocore) side of the STS tests, against a moto_server that verifies
signatures and session tokens.

  aws_sts.py bootstrap ENDPOINT
      Makes an IAM user with keys and full rights (moto's first three unauthenticated
      calls), then, signed as that user, a role `app` that any principal may assume and
      that may use S3. Prints {"access_key_id", "secret_access_key", "role_arn"}.

  aws_sts.py call ENDPOINT
      With only the credentials boto3 finds itself (environment or a profile, e.g. one
      with credential_process), calls sts:GetCallerIdentity and s3:ListBuckets. Prints
      {"arn": …} on success; exits 1 with the error on stderr otherwise.
"""

import json
import sys

import boto3


def bootstrap(endpoint):
    anonymous = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    anonymous.create_user(UserName="mayfly")
    key = anonymous.create_access_key(UserName="mayfly")["AccessKey"]
    everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    anonymous.put_user_policy(UserName="mayfly", PolicyName="all", PolicyDocument=json.dumps(everything))
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
            }
        ],
    }
    role = iam.create_role(RoleName="app", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    s3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_role_policy(RoleName="app", PolicyName="s3", PolicyDocument=json.dumps(s3))
    print(
        json.dumps(
            {
                "access_key_id": key["AccessKeyId"],
                "secret_access_key": key["SecretAccessKey"],
                "role_arn": role["Arn"],
            }
        )
    )


def call(endpoint):
    session = boto3.session.Session(region_name="us-east-1")
    try:
        identity = session.client("sts", endpoint_url=endpoint).get_caller_identity()
        session.client("s3", endpoint_url=endpoint).list_buckets()
    except Exception as e:  # noqa: BLE001 - the test reads the message
        print(f"aws call failed: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"arn": identity["Arn"]}))


if __name__ == "__main__":
    {"bootstrap": bootstrap, "call": call}[sys.argv[1]](sys.argv[2])
